"""Command glue of `ks-keras` subcommands that join library modules (see `ks_keras.cli`)."""
