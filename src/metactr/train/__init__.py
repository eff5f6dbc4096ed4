"""metactr.train"""
