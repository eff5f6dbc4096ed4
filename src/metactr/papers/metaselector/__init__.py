"""papers/metaselector"""
