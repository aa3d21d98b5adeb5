-- Each local host's upload across the fleet: the IP bytes and packets it sent to
-- non-local destinations, through every gateway together.
--   psql -d fleet -v local_net=198.18.0.0/15 -f host_upload.sql
-- Columns: host | upload_bytes | upload_packets | gateways
SELECT ip_src AS host,
       SUM(bytes) AS upload_bytes,
       SUM(packets) AS upload_packets,
       COUNT(DISTINCT peer_ip_src) AS gateways
FROM flows
WHERE ip_src <<= :'local_net'::cidr
  AND NOT ip_dst <<= :'local_net'::cidr
GROUP BY ip_src
ORDER BY upload_bytes DESC, host;
