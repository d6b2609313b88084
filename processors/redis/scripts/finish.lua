-- KEYS: decision, then lease and data (none on a cluster). ARGV: outcome, sent, decision id, ttl, status, grace, token,
-- dead-lettered (1/0).
return finish(KEYS[1], ARGV[3], ARGV[1], ARGV[5], ARGV[7], ARGV[8], ARGV[4], ARGV[6], now,
  KEYS[2], KEYS[3])
