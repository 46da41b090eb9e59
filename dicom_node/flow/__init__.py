"""Study flow after archiving: scoring worker supervisor and the scoring processes it runs."""
