"""The applications built on the library: the ``hf-encore`` command line (``cli``), the resumable lifelong
benchmark (``lifelong``) and the first-run demo (``demo``). The library never imports them."""
