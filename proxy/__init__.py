"""regcache's HTTP face: the registry API, the pull-through logic and the admin API."""
