"""metactr.meta"""
