"""The token: made, shared, stored and compared in one place."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from echotwist import tokens


class TokenTests(TestCase):
    def test_generated_tokens_are_40_hex_and_new_each_time(self) -> None:
        made = {tokens.generate_token() for _ in range(50)}
        self.assertEqual(len(made), 50)
        for token in made:
            self.assertRegex(token, r"\A[0-9a-f]{40}\Z")

    def test_environment_overrides(self) -> None:
        shared = "shared-token-0123"
        self.assertEqual(tokens.server_token({"ECHOTWIST_TOKEN": f" {shared} \n"}), shared)
        self.assertTrue(re.fullmatch(r"[0-9a-f]{40}", tokens.server_token({})))

    def test_unusable_environment_token_is_an_error(self) -> None:
        for bad in ("", "   ", "two words", "caf\u00e9", "abc", "x" * 15):
            self.assertRaises(tokens.TokenError, tokens.server_token, {"ECHOTWIST_TOKEN": bad})

    def test_token_file_is_0600_and_replaced_atomically(self) -> None:
        path = Path(self.mktemp())
        path.write_text("old\n")
        os.chmod(path, 0o644)
        tokens.write_token_file(path, "new-token")
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(tokens.read_token_file(path), "new-token")
        self.assertEqual([p.name for p in path.parent.iterdir() if p.name.startswith(".")], [])

    def test_token_header_and_bearer_are_both_accepted(self) -> None:
        checker = tokens.TokenChecker("abc")
        self.assertTrue(checker.authorized(Headers({b"token": [b"abc"]})))
        self.assertTrue(checker.authorized(Headers({b"authorization": [b"Bearer abc"]})))
        self.assertTrue(checker.authorized(Headers({b"authorization": [b"bearer abc"]})))

    def test_wrong_or_missing_tokens_are_refused(self) -> None:
        checker = tokens.TokenChecker("abc")
        for headers in (
            Headers(),
            Headers({b"token": [b"abd"]}),
            Headers({b"token": [b"ab"]}),
            Headers({b"token": [b"abcd"]}),
            Headers({b"authorization": [b"Basic abc"]}),
            Headers({b"authorization": [b"Bearer"]}),
        ):
            self.assertFalse(checker.authorized(headers), headers)
