"""One module per `lowbit` command; `lowbit.cli.main` registers them on the group."""
