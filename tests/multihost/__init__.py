"""Tests on several hosts in Linux network namespaces; rig.py is the rig they run on."""
