"""One router per concern: prediction, health and information, metrics."""
