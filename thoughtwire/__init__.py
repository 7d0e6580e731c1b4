"""The command line and the Python client of the thoughtwire gateway."""
