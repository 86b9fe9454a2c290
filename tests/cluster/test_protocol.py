"""The control messages' schemas refuse what no worker sends."""
from common.cluster.protocol import Decoder, KVTransferred, RouterInbound, encode


def test_a_kv_transfer_report_with_a_negative_count_or_time_is_dropped():
    decoder = Decoder(RouterInbound, "test")
    assert decoder.decode(encode(KVTransferred(4096, 0.5))) == KVTransferred(4096, 0.5)
    for bad in (KVTransferred(-5, 0.5), KVTransferred(4096, -1.0)):
        assert decoder.decode(encode(bad)) is None
    assert decoder.num_dropped == 2
