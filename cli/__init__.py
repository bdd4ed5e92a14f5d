"""The ``instdisc`` command line (installed as the package ``instdisc_cli``): thin click commands over the library."""
