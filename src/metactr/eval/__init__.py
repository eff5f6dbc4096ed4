"""metactr.eval"""
