"""The broadcast bench root serves NACKs while it waits for the members' block reports
(aggbox/workloads/broadcast.py, RootControl.wait_all(serve=...)): a member whose socket
lost a packet its kernel had acknowledged NACKs it after send() returned, and waits for a
root that reads."""

import socket
import threading

from aggbox.workloads.broadcast import RootControl, _Lines


class FakeBroadcaster:
    """An endpoint with a socket that becomes readable (a NACK) and a serve() that reads
    it; the member reports its block only once it was served (as a real member does)."""

    def __init__(self, report):
        self.sock, self.peer = socket.socketpair()
        self.report = report
        self.served = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def serve(self, duration: float) -> int:
        self.sock.recv(64)
        self.served += 1
        self.report()
        return 1


def test_the_drain_answers_a_nack_that_blocks_a_members_report():
    control = RootControl.__new__(RootControl)  # its connections, without connecting
    root_sock, member_sock = _tcp_pair()  # TCP: _Lines sets TCP_NODELAY
    control.lines = {1: _Lines(root_sock, "member rank 1")}
    member = _Lines(member_sock, "root")
    sender = FakeBroadcaster(lambda: member.send({"block": 0}))
    sender.peer.send(b"nack")  # the member's NACK is waiting on the root's socket
    control.wait_all(lambda m: m.get("block") == 0, "block 0 (drain)", timeout=5.0,
                     serve=sender)
    assert sender.served == 1
    for s in (root_sock, member_sock, sender.sock, sender.peer):
        s.close()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    accepted: list[socket.socket] = []
    t = threading.Thread(target=lambda: accepted.append(listener.accept()[0]))
    t.start()
    client = socket.create_connection(listener.getsockname())
    t.join()
    listener.close()
    return accepted[0], client
