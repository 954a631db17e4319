"""Circuit breakers shared by the fleet: the board (:mod:`.board`), its Redis and local stores
(:mod:`.store`), the change feed that keeps a closed breaker free (:mod:`.watch`) and the operators'
commands (:mod:`.cli`)."""
