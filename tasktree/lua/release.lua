-- Drop a claim on a step only if this attempt still holds it (compare and delete, one step),
-- and give back the budget this attempt reserved for the step's call.
-- KEYS: claim, tree, node ; ARGV: token, step
unreserve(KEYS[2], KEYS[3], ARGV[2], ARGV[1])
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
