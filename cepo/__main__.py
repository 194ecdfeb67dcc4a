from cepo.cli import entry_point

entry_point()
