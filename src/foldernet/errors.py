"""The one exception type users see: its message names the file and the fix, never a traceback."""


class FoldernetError(Exception):
    """A problem with the user's input or environment, explained in plain words."""
