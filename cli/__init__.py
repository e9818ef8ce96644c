"""The single `pdl1` command line; each package contributes its own sub-commands."""
