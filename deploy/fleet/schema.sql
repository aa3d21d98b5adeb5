-- The table pmacct's nfacctd (pgsql plugin, deploy/fleet/nfacctd.conf) fills with the
-- IPFIX flows of every egress-monitor agent in the fleet: one row per aggregate and
-- 5-minute bin, inserted at each flush (no primary key: a bin may get several rows, the
-- queries sum them).
CREATE TABLE IF NOT EXISTS flows (
    peer_ip_src    inet     NOT NULL,  -- the exporting gateway (agent)
    ip_src         inet     NOT NULL,  -- sourceIPv4Address / sourceIPv6Address
    ip_dst         inet     NOT NULL,  -- destinationIPv4Address / destinationIPv6Address
    port_src       integer  NOT NULL,  -- sourceTransportPort
    port_dst       integer  NOT NULL,  -- destinationTransportPort
    ip_proto       smallint NOT NULL,  -- protocolIdentifier
    packets        bigint   NOT NULL,  -- packetDeltaCount, summed
    bytes          bigint   NOT NULL,  -- octetDeltaCount (IP bytes), summed
    stamp_inserted timestamp without time zone NOT NULL,  -- start of the 5-minute bin
    stamp_updated  timestamp without time zone
);
CREATE INDEX IF NOT EXISTS flows_src_bin ON flows (ip_src, stamp_inserted);
