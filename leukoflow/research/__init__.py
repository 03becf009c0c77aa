"""Offline explanation research: meta-explanations, TCAV, SpRAy, relevance location, the
seed-paper finding, dataset audit and explanation evaluation. Not used by live services."""
