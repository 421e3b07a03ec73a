"""Tests of zodbkmi.exceptions: each error class is defined once, there."""
import ast
import inspect
import os
import unittest

import zodbkmi
from zodbkmi import exceptions

SRC = os.path.dirname(zodbkmi.__file__)


def _defined_errors():
    """{class name: [module files defining it]} of every ``*Error`` class
    in the package."""
    found = {}
    for directory, _, files in os.walk(SRC):
        for name in files:
            if not name.endswith('.py'):
                continue
            path = os.path.join(directory, name)
            with open(path, encoding='utf-8') as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and \
                        node.name.endswith('Error'):
                    found.setdefault(node.name, []).append(
                        os.path.relpath(path, SRC))
    return found


class ExceptionsTests(unittest.TestCase):

    def test_each_error_class_defined_once(self):
        twice = {name: where for name, where in _defined_errors().items()
                 if len(where) > 1}
        self.assertEqual(twice, {})

    def test_no_error_of_exceptions_is_defined_elsewhere(self):
        ours = {name for name, obj in vars(exceptions).items()
                if inspect.isclass(obj) and issubclass(obj, Exception)
                and obj.__module__ == exceptions.__name__}
        elsewhere = {name: where for name, where in _defined_errors().items()
                     if name in ours and where != ['exceptions.py']}
        self.assertEqual(elsewhere, {})

    def test_usage_error_old_homes(self):
        from zodbkmi import cli
        from zodbkmi.cli import files
        from zodbkmi.cli import keys
        self.assertIs(cli.UsageError, exceptions.UsageError)
        self.assertIs(keys.UsageError, exceptions.UsageError)
        self.assertIs(files.UsageError, exceptions.UsageError)
        self.assertTrue(issubclass(exceptions.UsageError,
                                   exceptions.ZodbKmiError))

    def test_every_leaf_derives_from_the_base(self):
        for name, obj in vars(exceptions).items():
            if inspect.isclass(obj) and obj.__module__ == exceptions.__name__:
                self.assertTrue(issubclass(obj, exceptions.ZodbKmiError),
                                name)
                self.assertTrue(obj.__doc__, name)
