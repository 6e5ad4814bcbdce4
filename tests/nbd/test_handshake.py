"""The negotiation state machine: both roles talking to each other through bytes only."""
import pytest

from pyrep.nbd import handshake as H
from pyrep.nbd import proto as P
from pyrep.nbd.proto import LocalProtocolError, ProtocolError


def _pump(src, dst):
    """Deliver what ``src`` produced (bytes) to ``dst``; return the events ``dst`` sees."""
    def deliver(data):
        dst.receive_data(data)
        out = []
        while True:
            ev = dst.next_event()
            if ev is H.NEED_DATA:
                return out
            out.append(ev)
    return deliver


def _pair():
    c, s = H.Handshake(H.CLIENT), H.Handshake(H.SERVER)
    to_c, to_s = _pump(s, c), _pump(c, s)
    assert to_c(s.send(H.Greeting())) == [H.Greeting(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)]
    assert to_s(c.send(H.ClientFlags())) == [H.ClientFlags(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)]
    assert c.state == s.state == H.OPTIONS and c.no_zeroes and s.no_zeroes
    return c, s, to_c, to_s


def test_go_with_info_structured_and_meta_context():
    c, s, to_c, to_s = _pair()
    assert to_s(c.send(H.StructuredReply())) == [H.StructuredReply()]
    assert to_c(s.send(H.Ack())) == [H.Ack(P.OPT_STRUCTURED_REPLY)]
    assert c.structured_reply and s.structured_reply
    assert to_s(c.send(H.SetMetaContext("disk", ("base:allocation",)))) == [
        H.SetMetaContext("disk", ("base:allocation",))]
    to_c(s.send(H.MetaContext(7, "base:allocation")) + s.send(H.Ack()))
    assert c.meta_contexts == s.meta_contexts == {"base:allocation": 7}
    ev = to_s(c.send(H.Go("disk", (P.INFO_BLOCK_SIZE, P.INFO_DESCRIPTION))))
    assert ev == [H.Go("disk", (P.INFO_BLOCK_SIZE, P.INFO_DESCRIPTION))] and s.state == H.REPLY_GO
    got = to_c(s.send(H.InfoExport(1 << 30, P.TFLAG_HAS_FLAGS)) + s.send(H.InfoBlockSize(1, 4096, P.MAX_PAYLOAD)) +
               s.send(H.InfoDescription("a disk")) + s.send(H.Ack()))
    assert [type(e) for e in got] == [H.InfoExport, H.InfoBlockSize, H.InfoDescription, H.Ack]
    assert got[2].description == "a disk" and got[1].maximum == P.MAX_PAYLOAD
    assert c.state == s.state == H.TRANSMISSION
    assert (c.export_size, c.export_flags, c.export_name) == (1 << 30, P.TFLAG_HAS_FLAGS, "disk")


def test_list_info_error_then_export_name_with_zeroes():
    c, s = H.Handshake(H.CLIENT), H.Handshake(H.SERVER)
    to_c, to_s = _pump(s, c), _pump(c, s)
    to_c(s.send(H.Greeting(P.FLAG_FIXED_NEWSTYLE)))
    to_s(c.send(H.ClientFlags(P.FLAG_C_FIXED_NEWSTYLE)))
    assert not s.no_zeroes
    to_s(c.send(H.List()))
    got = to_c(s.send(H.Server("a")) + s.send(H.Server("b", "second")) + s.send(H.Ack()))
    assert [(e.name, e.details) for e in got[:2]] == [("a", ""), ("b", "second")] and c.state == H.OPTIONS
    to_s(c.send(H.Info("nope")))
    got = to_c(s.send(H.OptionError(P.REP_ERR_UNKNOWN, "no export 'nope'")))
    assert got == [H.OptionError(P.REP_ERR_UNKNOWN, "no export 'nope'", P.OPT_INFO)] and s.state == H.OPTIONS
    to_s(c.send(H.ExportName("a")))
    data = s.send(H.ExportNameReply(4096, 3))
    assert len(data) == 10 + 124
    assert to_c(data) == [H.ExportNameReply(4096, 3)] and c.state == H.TRANSMISSION


def test_starttls_moves_both_to_tls_then_options():
    c, s, to_c, to_s = _pair()
    to_s(c.send(H.StartTLS()))
    to_c(s.send(H.Ack()))
    assert c.state == s.state == H.TLS
    with pytest.raises(LocalProtocolError, match="client.*TLS"):
        c.send(H.List())
    c.tls_established()
    s.tls_established()
    assert c.state == s.state == H.OPTIONS and c.tls_active


def test_abort_closes():
    c, s, to_c, to_s = _pair()
    to_s(c.send(H.Abort()))
    to_c(s.send(H.Ack()))
    assert c.state == s.state == H.CLOSED


def test_unknown_and_malformed_options_become_events():
    c, s, to_c, to_s = _pair()
    assert to_s(c.send(H.UnknownOption(99, b"xyz"))) == [H.UnknownOption(99, b"xyz")]
    to_c(s.send(H.OptionError(P.REP_ERR_UNSUP)))
    # a GO whose count of info requests does not match its data
    raw = P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 7) + P.U32.pack(1) + b"a" + P.U16.pack(5)
    s.receive_data(raw)
    ev = s.next_event()
    assert isinstance(ev, H.InvalidOption) and ev.option == P.OPT_GO and "information requests" in ev.reason
    assert s.state == H.REPLY_SIMPLE


def test_illegal_moves_name_role_and_state():
    s = H.Handshake(H.SERVER)
    with pytest.raises(LocalProtocolError, match=r"server.*Ack.*GREETING"):
        s.send(H.Ack())
    with pytest.raises(LocalProtocolError, match="sent by the client"):
        s.send(H.List())
    c, s, to_c, to_s = _pair()
    with pytest.raises(LocalProtocolError, match=r"server.*InfoExport.*OPTIONS"):
        s.send(H.InfoExport(1, 1))


def test_bad_magic_and_oversized_options_raise_protocol_error():
    s = H.Handshake(H.SERVER)
    s.send(H.Greeting())
    s.receive_data(P.CLIENT_FLAGS.pack(P.FLAG_C_FIXED_NEWSTYLE))
    s.next_event()
    s.receive_data(P.OPTION_HEADER.pack(0x1234, P.OPT_LIST, 0))
    with pytest.raises(ProtocolError, match="bad magic"):
        s.next_event()
    s = H.Handshake(H.SERVER)
    s.send(H.Greeting())
    s.receive_data(P.CLIENT_FLAGS.pack(1) + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_LIST, 1 << 30))
    s.next_event()
    with pytest.raises(ProtocolError, match="carries"):
        s.next_event()
    s = H.Handshake(H.SERVER)
    s.send(H.Greeting())
    s.receive_data(P.CLIENT_FLAGS.pack(0x80))
    with pytest.raises(ProtocolError, match="unknown client flags"):
        s.next_event()
    c = H.Handshake(H.CLIENT)
    c.receive_data(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(ProtocolError, match="not an NBD server"):
        c.next_event()


def test_peer_closing_midway_is_a_protocol_error():
    s = H.Handshake(H.SERVER)
    s.send(H.Greeting())
    s.receive_data(b"\x00\x00")
    assert s.next_event() is H.NEED_DATA
    s.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed"):
        s.next_event()


def test_pipelined_options_wait_for_replies():
    c, s, to_c, to_s = _pair()
    data = c.send(H.StructuredReply())
    s.receive_data(data + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_LIST, 0))
    assert s.next_event() == H.StructuredReply()
    assert s.next_event() is H.NEED_DATA          # the LIST waits until the ACK is sent
    s.send(H.Ack())
    assert s.next_event() == H.List()


def test_transitions_table_is_the_only_source_of_moves():
    # every state but TRANSMISSION/CLOSED has a way out, and nothing leaves TRANSMISSION
    sources = {st for st, _ in H.TRANSITIONS}
    assert H.TRANSMISSION not in sources and H.CLOSED not in sources
    for st in (H.GREETING, H.CLIENT_FLAGS, H.OPTIONS, H.REPLY_GO, H.REPLY_INFO, H.REPLY_LIST, H.REPLY_META,
               H.REPLY_STARTTLS, H.REPLY_ABORT, H.REPLY_SIMPLE, H.REPLY_EXPORT_NAME, H.TLS):
        assert st in sources
