"""Workers: claim jobs, run agents and write the events they produce (``thoughtwire worker``)."""
