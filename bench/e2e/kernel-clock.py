#!/usr/bin/env python3
"""Saves and restores the kernel clock's NTP state (adjtimex status,
frequency, maximum and estimated error) around a run of NTPsec's ntpd.

ntpd sets STA_PLL and clears STA_UNSYNC at start even with "disable ntp"
and "disable kernel", which would leave the host's kernel clock announced
as synchronized (and chimed's kernel upstream following it) after the
benchmark. The time itself is never touched.

    kernel-clock.py save FILE
    kernel-clock.py restore FILE
"""
import ctypes
import ctypes.util
import json
import sys

ADJ_FREQUENCY, ADJ_MAXERROR, ADJ_ESTERROR, ADJ_STATUS = 0x0002, 0x0004, 0x0008, 0x0010


class Timex(ctypes.Structure):
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
                ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
                ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
                ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
                ("pad", ctypes.c_int * 11)]


def adjtimex(t):
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.adjtimex(ctypes.byref(t)) < 0:
        raise OSError(ctypes.get_errno(), "adjtimex")


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("save", "restore"):
        sys.exit(__doc__)
    if sys.argv[1] == "save":
        t = Timex()
        adjtimex(t)
        json.dump({k: getattr(t, k) for k in ("status", "freq", "maxerror", "esterror")}, open(sys.argv[2], "w"))
        return
    saved = json.load(open(sys.argv[2]))
    t = Timex()
    t.modes = ADJ_STATUS | ADJ_FREQUENCY | ADJ_MAXERROR | ADJ_ESTERROR
    t.status, t.freq = saved["status"], saved["freq"]
    t.maxerror, t.esterror = saved["maxerror"], saved["esterror"]
    adjtimex(t)
    now = Timex()
    adjtimex(now)
    print(f"kernel clock state restored: status {now.status:#x} (was {saved['status']:#x} before ntpd)")


main()
