"""The Gateway REST client (:mod:`.client`), its hot-path JSON POST (:mod:`.post`) and the asyncio network
backend under its connection pool (:mod:`.backend`)."""
