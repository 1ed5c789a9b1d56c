"""`openstack ekko ...` commands, version 1 of ekko-api (entry point group openstack.ekko.v1)."""
