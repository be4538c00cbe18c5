"""The `lbctl` command line: main (the parser), output, and one module per command."""
