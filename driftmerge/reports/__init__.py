"""What ``analyze`` and ``sweep`` write for people: JSON, Markdown tables and figures."""
