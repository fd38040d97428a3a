# A torch that cannot be imported: on PYTHONPATH, it makes torchrun's agent fail before
# any rank starts (tests/test_hosts.py).
raise ImportError("this torch is broken on purpose")
