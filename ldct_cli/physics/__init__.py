"""CT physics for simulating lower-dose scans: a parallel-beam projector and projection-domain noise insertion."""
