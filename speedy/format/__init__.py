"""The on-disk chunk file format: superblock, records, the record scanner.

Imports nothing else of speedy (an import contract checks it).
"""
