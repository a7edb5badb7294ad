"""potentials"""
