"""Ports handed to the stack's listeners stay out of the kernel's ephemeral range, so an
outgoing connection cannot take one between the pick and the listener's bind."""

from __future__ import annotations

import socket

from processors.devstack.processes import LISTEN_PORTS_FROM, _ephemeral_low, free_ports


def test_listener_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low = _ephemeral_low()
    ports = free_ports(20)
    assert len(set(ports)) == 20
    if low - LISTEN_PORTS_FROM >= 1_000:  # room below the range (the kernel's default)
        assert all(LISTEN_PORTS_FROM <= p < low for p in ports)
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_never_handed_out() -> None:
    held = []
    try:
        for port in free_ports(5):
            s = socket.socket()
            s.bind(("127.0.0.1", port))
            s.listen()
            held.append(s)
        in_use = {s.getsockname()[1] for s in held}
        for _ in range(20):
            assert not in_use & set(free_ports(10))
    finally:
        for s in held:
            s.close()
