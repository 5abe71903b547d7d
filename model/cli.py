"""How the command-line tools show --help (stdlib only: the chat client and the data scripts import it without
torch)."""

import argparse
import copy


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with the script's docstring as written (its example commands one per line) and each flag's default,
    unless the help text already says it or there is none to show (None, "", a switch's False)."""

    def add_argument(self, action: argparse.Action) -> None:
        if not action.help and self._shows_default(action):  # argparse prints nothing for a flag without help
            action = copy.copy(action)
            action.help = "default: %(default)s"
        super().add_argument(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return f"{text} (default: %(default)s)" if "default" not in text and self._shows_default(action) else text

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        nothing = any(action.default is value for value in (None, False, argparse.SUPPRESS)) or action.default == ""
        return bool(action.option_strings) and not nothing
