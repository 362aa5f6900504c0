"""One module per experiment; each composes interventions on a loaded model."""
