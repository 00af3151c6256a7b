"""Pure codecs: the chunkserver protocol, the master's JSON, keys and the manifest.

Imports nothing else of speedy (an import contract checks it).
"""
