"""A QUIC peer for the labs (aioquic, installed by `cargo xtask setup`).

server: accepts connections on PORT with CERT and KEY; on each stream it counts the
        bytes until the stream ends and answers with the count as decimal text.
client: connects to HOST PORT in QUIC version 1 or 2 (RFC 9369) sending SNI as
        server_name (the certificate is not verified), sends BYTES bytes on one stream,
        ends it, and prints the server's count. Bounded: gives up after TIMEOUT seconds.
"""

import argparse
import asyncio
import ssl
import sys

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicProtocolVersion
from aioquic.quic.events import StreamDataReceived

ALPN = ["egress-lab"]
VERSIONS = {1: QuicProtocolVersion.VERSION_1, 2: QuicProtocolVersion.VERSION_2}


class Counter(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.received = {}

    def quic_event_received(self, event):
        if isinstance(event, StreamDataReceived):
            count = self.received.get(event.stream_id, 0) + len(event.data)
            self.received[event.stream_id] = count
            if event.end_stream:
                self._quic.send_stream_data(event.stream_id, str(count).encode(), end_stream=True)
                self.transmit()


async def run_server(args):
    config = QuicConfiguration(is_client=False, alpn_protocols=ALPN)
    config.load_cert_chain(args.cert, args.key)
    await serve(args.host, args.port, configuration=config, create_protocol=Counter)
    print("listening", flush=True)
    await asyncio.Event().wait()


async def run_client(args):
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=ALPN,
        server_name=args.sni,
        verify_mode=ssl.CERT_NONE,
        supported_versions=[VERSIONS[args.quic_version]],
    )
    async with connect(args.host, args.port, configuration=config) as client:
        reader, writer = await client.create_stream()
        writer.write(b"x" * args.bytes)
        writer.write_eof()
        print(int(await reader.read()), flush=True)


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    server = sub.add_parser("server")
    server.add_argument("--host", required=True)
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--cert", required=True)
    server.add_argument("--key", required=True)
    client = sub.add_parser("client")
    client.add_argument("--host", required=True)
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--sni", required=True)
    client.add_argument("--bytes", type=int, required=True)
    client.add_argument("--quic-version", type=int, choices=VERSIONS, default=1)
    client.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    if args.mode == "server":
        asyncio.run(run_server(args))
    else:
        asyncio.run(asyncio.wait_for(run_client(args), args.timeout))


if __name__ == "__main__":
    sys.exit(main())
