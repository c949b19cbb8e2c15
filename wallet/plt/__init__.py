"""PLT/1 at a province node: the database side of the protocol in `protocol/`.

`outbox` and `dispatch` are the seam between the transport (sending, receiving, signing)
and the features that speak the protocol (cross-province relationships, quota grants).
"""
