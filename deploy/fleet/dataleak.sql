-- The agent's DataLeak rule (--leak-group src), fleet-wide: per local host, the bytes it
-- sent to non-local destinations in each 5-minute window (the table's bins, all gateways
-- together); windows over window_threshold are summed over the last leak_period, and a
-- sum over leak_threshold is a leak.
--   psql -d fleet -v local_net=198.18.0.0/15 -v window_threshold=5000000 \
--        -v leak_threshold=100000000 -v leak_period="'24 hours'" -f dataleak.sql
-- Columns: host | leak_bytes | windows
WITH windows AS (
    SELECT ip_src, stamp_inserted, SUM(bytes) AS bytes
    FROM flows
    WHERE ip_src <<= :'local_net'::cidr
      AND NOT ip_dst <<= :'local_net'::cidr
      AND stamp_inserted >= LOCALTIMESTAMP - :leak_period::interval
    GROUP BY ip_src, stamp_inserted
)
SELECT ip_src AS host, SUM(bytes) AS leak_bytes, COUNT(*) AS windows
FROM windows
WHERE bytes > :window_threshold
GROUP BY ip_src
HAVING SUM(bytes) > :leak_threshold
ORDER BY leak_bytes DESC, host;
