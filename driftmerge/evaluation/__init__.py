"""Scoring models along the drift: generation (with logit extrapolation), verifiable rewards, log-prob linearity,
a loaded model moved in place, and the toy addition task the demo's run learned."""
