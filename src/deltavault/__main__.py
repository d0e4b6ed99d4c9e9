from deltavault.cli.main import entry

entry()
