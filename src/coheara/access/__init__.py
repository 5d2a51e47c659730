"""Who may call the service, and where the service may send data."""
