"""The Lambda edge of the queue: events in, responses out, Powertools wiring."""
