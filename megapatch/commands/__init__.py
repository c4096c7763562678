"""CLI subcommands: thin wrappers that parse arguments and call the library."""
