"""Running the instrument: collector, recorder, orchestration, replay, live view."""
