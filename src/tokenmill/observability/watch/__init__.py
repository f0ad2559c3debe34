"""`tokenmill watch`: incident detection on live metrics (signals -> change detectors ->
diagnosis -> sinks)."""
