-- Keep a claim alive while its holder lives: extend it only if this token still holds it.
-- KEYS: claim ; ARGV: token, lease (ms)
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
