"""The xfeat command line: parses arguments and calls the library."""
