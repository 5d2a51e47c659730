"""What a site's hardware can do with the model: capacity planning (and, later, doctor
and the latency bench)."""
