"""Streamed chunks in Redis streams: written by workers (:mod:`.publisher`), read by apps (:mod:`.reader`)."""
